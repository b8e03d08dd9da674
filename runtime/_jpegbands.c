/* Decode one band of rows of a JPEG with the libjpeg API (libjpeg-turbo), for runtime/jpeg_bands.py.
 *
 * Built at install as an optional extension (setup.py) and called through ctypes, which releases
 * the GIL: two threads decode the top and the bottom band of one image at once. The bottom band
 * entropy-decodes the rows above it (jpeg_skip_scanlines: no IDCT, upsampling or colour conversion
 * for them); each band writes only its own rows of `out`.
 *
 * libjpeg reports errors by calling error_exit, whose default ends the process: here error_exit
 * and every warning longjmp back with the message, so bytes from the network can only produce a
 * return code. Warnings count as failures (the caller then takes its strict decoder's path, which
 * refuses them too).
 *
 * Return codes (JB_* below): 0 decoded; 1 libjpeg error; 2 libjpeg warning; 3 the image is not
 * what the caller was told (size) or decodes to something else than 3 channels; 4 not split here
 * (progressive or multi-scan, or a sampling this file does not take: the caller decodes it whole).
 */

#include <setjmp.h>
#include <stddef.h>
#include <stdio.h> /* jpeglib.h uses FILE and size_t */
#include <string.h>

#include <jpeglib.h>

#define JB_OK 0
#define JB_ERROR 1
#define JB_WARNING 2
#define JB_MISMATCH 3
#define JB_NOT_SPLIT 4

#define ROWS_PER_CALL 32

struct jb_error {
  struct jpeg_error_mgr pub; /* first: libjpeg sees a jpeg_error_mgr */
  jmp_buf jump;
  char *msg;
  int msg_len;
};

static void jb_fail(j_common_ptr cinfo, int code) {
  struct jb_error *err = (struct jb_error *)cinfo->err;
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  if (err->msg != NULL && err->msg_len > 0) {
    strncpy(err->msg, text, (size_t)err->msg_len - 1);
    err->msg[err->msg_len - 1] = '\0';
  }
  longjmp(err->jump, code);
}

static void jb_error_exit(j_common_ptr cinfo) { jb_fail(cinfo, JB_ERROR); }

/* level < 0: a warning (corrupt data, premature end...); >= 0: trace messages, ignored */
static void jb_emit_message(j_common_ptr cinfo, int level) {
  if (level < 0) jb_fail(cinfo, JB_WARNING);
}

/* Luma sampling 1x1, 2x1 or 2x2 with 1x1 chroma (4:4:4, 4:2:2, 4:2:0), or one grey component:
 * the samplings the band split is tested on (tests/runtime/test_jpeg_bands.py). */
static int jb_sampling_ok(const struct jpeg_decompress_struct *cinfo) {
  int h, v, c;
  if (cinfo->num_components == 1) return 1;
  if (cinfo->num_components != 3) return 0;
  h = cinfo->comp_info[0].h_samp_factor;
  v = cinfo->comp_info[0].v_samp_factor;
  if (!((h == 1 && v == 1) || (h == 2 && v == 1) || (h == 2 && v == 2))) return 0;
  for (c = 1; c < 3; c++)
    if (cinfo->comp_info[c].h_samp_factor != 1 || cinfo->comp_info[c].v_samp_factor != 1) return 0;
  return 1;
}

/* Rows [row0, row1) of the (height, width, 3) uint8 RGB image in `data` into the same rows of
 * `out` (height * width * 3 bytes, C order). 0 <= row0 < row1 <= height. A band that is not the
 * whole image needs a single-scan (baseline or extended sequential) JPEG. */
int jb_decode_rows(const unsigned char *data, unsigned long size, unsigned char *out, int width,
                   int height, int row0, int row1, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct jb_error err;
  JSAMPROW rows[ROWS_PER_CALL];
  int code;

  if (msg != NULL && msg_len > 0) msg[0] = '\0';
  if (width <= 0 || height <= 0 || row0 < 0 || row1 > height || row0 >= row1) return JB_MISMATCH;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = jb_error_exit;
  err.pub.emit_message = jb_emit_message;
  err.msg = msg;
  err.msg_len = msg_len;
  code = setjmp(err.jump);
  if (code != 0) {
    jpeg_destroy_decompress(&cinfo);
    return code;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  code = JB_OK;
  if ((long)cinfo.image_width != width || (long)cinfo.image_height != height)
    code = JB_MISMATCH;
  else if ((row0 > 0 || row1 < height) && (jpeg_has_multiple_scans(&cinfo) || !jb_sampling_ok(&cinfo)))
    code = JB_NOT_SPLIT;
  if (code != JB_OK) {
    jpeg_destroy_decompress(&cinfo);
    return code;
  }
  /* what Pillow's and simplejpeg's decoders use: accurate integer IDCT, fancy upsampling */
  cinfo.out_color_space = JCS_RGB;
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&cinfo);
  if (cinfo.output_components != 3 || (long)cinfo.output_width != width ||
      (long)cinfo.output_height != height) {
    jpeg_destroy_decompress(&cinfo);
    return JB_MISMATCH;
  }
  if (row0 > 0 && (int)jpeg_skip_scanlines(&cinfo, (JDIMENSION)row0) != row0) {
    jpeg_destroy_decompress(&cinfo);
    return JB_MISMATCH;
  }
  while ((int)cinfo.output_scanline < row1) {
    int n = row1 - (int)cinfo.output_scanline, i;
    if (n > ROWS_PER_CALL) n = ROWS_PER_CALL;
    for (i = 0; i < n; i++)
      rows[i] = out + ((size_t)cinfo.output_scanline + (size_t)i) * (size_t)width * 3;
    if (jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)n) == 0) { /* suspended: cannot happen from memory */
      jpeg_destroy_decompress(&cinfo);
      return JB_MISMATCH;
    }
  }
  /* the last band reads on to the end of the image, where a warning about the data can still come */
  if (row1 == height)
    jpeg_finish_decompress(&cinfo);
  else
    jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return JB_OK;
}
